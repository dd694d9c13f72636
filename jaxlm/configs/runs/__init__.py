"""gin files (package data); this file lets gin read them as package resources from any directory."""
