"""Inference cost per task of 100 instances: adapter (instruction read once) vs def_pos2 vs ICIL.

SmolLM2-135M-Instruct, real Super-NI test tasks from ../shared/data. For each method the prompts
are batched exactly as the eval engine batches them (sorted by length, batch 8, length buckets) and
each batch's FLOPs come from XLA's cost analysis of the jitted scoring forward (`jit(...).lower(...)
.cost_analysis()`, padding included: what really runs). Generation steps are the same number for
every method and are left out; the forward over the prompt is what differs.

- adapter: one forward of the instruction (Definition) through the base model (the hypernetwork's
  "base" encoder), plus the hypernetwork's own pass (jaxlm/models/hypernet.py HyperLoRA: width 256,
  depth 2, LoRA r8 on q_proj/v_proj), plus LoRA-applied forwards of the 100 bare inputs;
- adapter + fusion: the same, plus the LoRA-adapted model's pass over the instruction once per task
  (a cached prefix, `jaxlm.models.prefix`) and every input attending to its keys/values;
- def_pos2: Tk-Instruct definition + 2 positive examples + input, every instance;
- ICIL: 8 fixed training-task demonstrations + the target definition + input (<= 1024 tokens).

Latency: the same forwards run through `Engine.score` (the target's last token scored), compile
excluded, for --latency_instances instances of the first task (scaled to 100 when fewer).

    nice python bench/adapter_flops.py --quick            # 2 tasks for FLOPs, latency on 8 instances
    nice python bench/adapter_flops.py                    # every test task on disk, latency on 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxlm
from jaxlm.buckets import bucket_length, pad_rows
from jaxlm.eval import engine as engine_lib
from jaxlm.eval.engine import Engine
from jaxlm.models import lora as lora_lib
from jaxlm.models.llama import init_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEC = lora_lib.LoraSpec(("q_proj", "v_proj"), rank=8, alpha=16)


def flops_of(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


class Costs:
    """FLOPs of the engine's scoring forward per padded batch shape (cached: shapes repeat)."""

    def __init__(self, engine: Engine):
        self.engine, self._cache = engine, {}

    def forward(self, width: int, lora) -> float:
        key = (width, lora is not None)
        if key not in self._cache:
            b = self.engine.batch_size
            ids = jax.ShapeDtypeStruct((b, width), jnp.int32)
            mask = jax.ShapeDtypeStruct((b, width), jnp.bool_)
            at = jax.ShapeDtypeStruct((b, 16), jnp.int32)
            valid = jax.ShapeDtypeStruct((b, 16), jnp.bool_)
            fn = engine_lib._decoder_only_scorer(self.engine.model)
            self._cache[key] = flops_of(fn.lower(self.engine.params, ids, mask, at, valid, lora, None))
        return self._cache[key]

    def unpadded(self, rows: list[list[int]], lora=None) -> float:
        """Sum over prompts of one unpadded forward each: FLOPs(L) = a + b L + c L^2 (matmuls are
        linear in L, attention quadratic), fitted exactly on cost analyses of batch-1 forwards."""
        key = ("fit", lora is not None)
        if key not in self._cache:
            widths = np.array([64.0, 256.0, 1024.0])
            one = Engine(self.engine.pretrained, batch_size=1)
            flops = [Costs(one).forward(int(w), lora) for w in widths]
            self._cache[key] = np.polyfit(widths, flops, 2)
        return float(sum(np.polyval(self._cache[key], len(r)) for r in rows))

    def prompts(self, rows: list[list[int]], lora=None) -> float:
        """Sum over the engine's batches of these prompts (scored as prompt[:-1] -> last token)."""
        total = 0.0
        for batch in self.engine._batches([len(r) for r in rows]):
            total += self.forward(bucket_length(max(len(rows[i]) for i in batch), self.engine.buckets), lora)
        return total


class FusionCosts:
    """Decoder-only fusion (HypernetConfig.fusion on a Llama base): the adapted model reads the instruction
    once as a cached prefix (`jaxlm.models.prefix`), then every input attends to its keys/values too."""

    def __init__(self, engine: Engine, lora):
        from jaxlm.models import prefix as prefix_lib

        self.engine, self.lora, self.prefix_lib = engine, lora, prefix_lib
        model = engine.model
        self._prefill = jax.jit(lambda p, i, m, a, extra: prefix_lib.prefix_cache(model, p, i, m, extra_slots=extra, lora=a),
                                static_argnums=4)
        self._continue = jax.jit(lambda p, c, n, i, m, a, t: prefix_lib.continue_from_prefix(
            model, p, c, n, i, m, lora=a, gather_index=t), )

    def _abstract(self, batch: int, slots: int):
        cache = jax.eval_shape(lambda: init_cache(self.engine.pretrained.config, batch, slots))
        return cache, jax.ShapeDtypeStruct((batch,), jnp.int32)

    def prefix_flops(self, prefix_width: int, extra: int) -> float:
        ids = jax.ShapeDtypeStruct((1, prefix_width), jnp.int32)
        return flops_of(self._prefill.lower(self.engine.params, ids, ids, self.lora, extra))

    def continuation_flops(self, width: int, prefix_width: int) -> float:
        b = self.engine.batch_size
        cache, n = self._abstract(b, prefix_width + width)
        ids = jax.ShapeDtypeStruct((b, width), jnp.int32)
        at = jax.ShapeDtypeStruct((b, 16), jnp.int32)  # 16 scored positions, as the engine's scorer (Costs.forward)
        return flops_of(self._continue.lower(self.engine.params, cache, n, ids, ids, self.lora, at))

    def prompts(self, instruction: list[int], rows: list[list[int]]) -> float:
        """FLOPs of one task: the adapted prefix pass once, then the engine's batches of inputs."""
        p = bucket_length(len(instruction), self.engine.buckets)
        widths = [bucket_length(max(len(rows[i]) for i in batch), self.engine.buckets)
                  for batch in self.engine._batches([len(r) for r in rows])]
        return self.prefix_flops(p, max(widths)) + sum(self.continuation_flops(w, p) for w in widths)

    def latency(self, instruction: list[int], rows: list[list[int]]) -> float:
        """Seconds for one task (compile excluded): the prefix pass, then every batch continuing from it."""
        p = bucket_length(len(instruction), self.engine.buckets)
        batches = list(self.engine._batches([len(r) for r in rows]))
        widths = [bucket_length(max(len(rows[i]) for i in batch), self.engine.buckets) for batch in batches]
        extra = max(widths)
        pre_ids, pre_mask = pad_rows([instruction], p, 0)

        def run() -> None:
            cache, n = self._prefill(self.engine.params, pre_ids, pre_mask, self.lora, extra)
            b = self.engine.batch_size
            wide = self.prefix_lib.take_rows(cache, jnp.zeros((b,), jnp.int32))
            for batch, w in zip(batches, widths):
                chunk = [rows[i] for i in batch] + [rows[batch[0]]] * (b - len(batch))
                ids, mask = pad_rows(chunk, w, 0)
                last = jnp.asarray([[len(r) - 1] * 16 for r in chunk], jnp.int32)  # as the engine's scorer
                self._continue(self.engine.params, jax.tree_util.tree_map(lambda x: x[:, :, :p + w] if x.ndim == 4 else x[:, :p + w], wide),
                               jnp.broadcast_to(n, (b,)), ids, mask, self.lora, last).block_until_ready()

        run()  # compile every shape
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0


def hypernet_flops(pre, instruction_ids: list[int]) -> tuple[float, float, str]:
    """(instruction-encoding forward FLOPs, hypernetwork FLOPs, note) for one instruction."""
    from jaxlm.checkpoints.pretrained import abstract_params

    width = bucket_length(len(instruction_ids), (16, 32, 64, 128, 256, 512, 1024))
    ids, mask = pad_rows([instruction_ids], width, pre.tokenizer.pad_id or 0)
    model = pre.model
    enc = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output="hidden"))
    enc_flops = flops_of(enc.lower(pre.params, ids, mask))
    try:
        from jaxlm.models import hypernet
    except ImportError:
        return enc_flops, 0.0, "hypernetwork module missing: its cost modelled as the instruction-encoding forward only"
    config = hypernet.HypernetConfig(lora=SPEC, width=256, depth=2, num_heads=4, encoder="base")
    slots = hypernet.lora_slots(abstract_params(pre.family, pre.config), SPEC)
    hyper = hypernet.HyperLoRA(config, slots)
    h = jax.ShapeDtypeStruct((1, width, pre.config.hidden_size), jnp.float32)
    m = jax.ShapeDtypeStruct((1, width), jnp.bool_)
    params = jax.eval_shape(lambda x, k: lora_lib.unbox(hyper.init(jax.random.PRNGKey(0), x, k)["params"]), h, m)
    hyp_flops = flops_of(jax.jit(lambda p, x, k: hyper.apply({"params": p}, x, k)).lower(params, h, m))
    return enc_flops, hyp_flops, "HyperLoRA width 256, depth 2, r8 q_proj/v_proj (jaxlm/models/hypernet.py)"


def icil_length_demos(train_tasks, count, k: int = 8, max_demo_tokens: int = 256):
    """The ICIL demo set (the largest K <= 8 the data allows), topped up to K demos of <= 256 tokens from
    other training tasks when the data has too few qualifying tasks: the prompt has ICIL's length,
    which is all a cost measurement needs."""
    from jaxlm.data import icil
    from jaxlm.errors import DataError

    demos = None
    for kk in range(k, 0, -1):
        try:
            demos = icil.build_icil_demos(train_tasks, k=kk, seed=0, max_demo_tokens=max_demo_tokens, count_tokens=count)
            break
        except DataError:
            continue
    chosen = list(demos.demos) if demos else []
    for name in sorted(set(train_tasks) - {d["task"] for d in chosen}):
        if len(chosen) >= k:
            break
        task = train_tasks[name]
        for x in task.instances:
            if x.outputs and count(icil.demo_text(task.definition, x.input, x.outputs[0])) <= max_demo_tokens:
                chosen.append({"task": name, "definition": task.definition.strip(), "input": x.input.strip(),
                               "output": x.outputs[0].strip()})
                break
    METHOD_NOTES["icil"] = f"{demos.k if demos else 0} qualifying ICIL demos + {len(chosen) - (demos.k if demos else 0)} length fillers"
    return icil.ICILDemoSet(seed=0, k=len(chosen), tasks=[d["task"] for d in chosen], demos=chosen)


METHOD_NOTES: dict[str, str] = {}


def method_prompts(pre, tasks, train_tasks, n: int, max_len: int) -> dict[str, dict[str, list[list[int]]]]:
    from jaxlm.data import icil
    from jaxlm.data.prompts import format_prompt

    tok = pre.tokenizer
    count = lambda text: len(tok.encode(text))
    demos = icil_length_demos(train_tasks, count)
    out = {}
    for name, task in tasks.items():
        inst = task.instances[:n]
        cut = lambda ids: ids[-max_len:]  # left-truncate the rare over-long prompt
        out[name] = {
            "def_pos2": [cut(tok.encode(format_prompt(task, x, "def_pos2", count_tokens=count))) for x in inst],
            "icil": [cut(tok.encode(icil.icil_prompt(demos, task, x, max_tokens=max_len, count_tokens=count))) for x in inst],
            "adapter_inputs": [cut(tok.encode(format_prompt(task, x, "none"))) for x in inst],
            "instruction": [cut(tok.encode(format_prompt(task, inst[0], "instruction")))],
        }
    return out


def latency(engine: Engine, rows: list[list[int]], lora=None) -> float:
    examples = [(r[:-1], r[-1:]) for r in rows]
    kw = {"lora": lora} if lora is not None else {}
    engine.score(examples, **kw)  # compile every shape
    t0 = time.perf_counter()
    engine.score(examples, **kw)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DATA))
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--max_tasks", type=int, default=None)
    parser.add_argument("--latency_instances", type=int, default=100)
    parser.add_argument("--max_source_length", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="2 tasks, latency on 8 instances")
    args = parser.parse_args()
    if args.quick:
        args.max_tasks, args.latency_instances = 2, 8
    from jaxlm.data.sources import load_tasks

    pre = jaxlm.load_pretrained("smollm2-135m-instruct")
    data = Path(args.data_dir) / "superni"
    tasks = load_tasks("superni", data, part="test", max_instances=args.instances)
    tasks = dict(list(tasks.items())[: args.max_tasks])
    train = load_tasks("superni", data, part="train")
    prompts = method_prompts(pre, tasks, train, args.instances, args.max_source_length)
    engine = Engine(pre, batch_size=8)
    costs = Costs(engine)
    lora = lora_lib.init_lora(SPEC, pre.params)
    fusion = FusionCosts(engine, lora)
    rows, note = [], ""
    for name, p in prompts.items():
        enc, hyp, note = hypernet_flops(pre, p["instruction"][0])
        adapter = enc + hyp + costs.prompts(p["adapter_inputs"], lora)
        d2, ic = costs.prompts(p["def_pos2"]), costs.prompts(p["icil"])
        tokens = {k: int(sum(map(len, v))) for k, v in p.items()}
        fused = enc + hyp + fusion.prompts(p["instruction"][0], p["adapter_inputs"])
        exact = {"adapter": costs.unpadded(p["instruction"]) + hyp + costs.unpadded(p["adapter_inputs"], lora),
                 "def_pos2": costs.unpadded(p["def_pos2"]), "icil": costs.unpadded(p["icil"])}
        rows.append({"task": name, "instances": len(p["def_pos2"]), "tokens": tokens,
                     "gflops_unpadded": {m: v / 1e9 for m, v in exact.items()},
                     "unpadded_adapter_vs_def_pos2": exact["adapter"] / exact["def_pos2"],
                     "unpadded_adapter_vs_icil": exact["adapter"] / exact["icil"],
                     "gflops": {"adapter": adapter / 1e9, "adapter_fusion": fused / 1e9,
                                "adapter_instruction_encoding": enc / 1e9,
                                "adapter_hypernet": hyp / 1e9, "def_pos2": d2 / 1e9, "icil": ic / 1e9},
                     "adapter_vs_def_pos2": adapter / d2, "adapter_vs_icil": adapter / ic,
                     "adapter_fusion_vs_adapter": fused / adapter, "adapter_fusion_vs_def_pos2": fused / d2})
    first = next(iter(prompts.values()))
    k = min(args.latency_instances, len(first["def_pos2"]))
    scale = len(first["def_pos2"]) / k
    lat = {
        "def_pos2": latency(engine, first["def_pos2"][:k]) * scale,
        "icil": latency(engine, first["icil"][:k]) * scale,
        "adapter_inputs": latency(engine, first["adapter_inputs"][:k], lora) * scale,
    }
    # One instruction forward (the hypernetwork's own pass is a few small matmuls, not timed).
    lat["adapter"] = lat["adapter_inputs"] + latency(engine, first["instruction"])
    lat["adapter_fusion"] = (latency(engine, first["instruction"])
                             + fusion.latency(first["instruction"][0], first["adapter_inputs"][:k]) * scale)
    summary = {
        "note": note, "icil_demos": METHOD_NOTES.get("icil"),
        "mean_unpadded_flops_ratio_adapter_vs_def_pos2": float(np.mean([r["unpadded_adapter_vs_def_pos2"] for r in rows])),
        "mean_unpadded_flops_ratio_adapter_vs_icil": float(np.mean([r["unpadded_adapter_vs_icil"] for r in rows])),
        "mean_flops_ratio_adapter_vs_def_pos2": float(np.mean([r["adapter_vs_def_pos2"] for r in rows])),
        "mean_flops_ratio_adapter_vs_icil": float(np.mean([r["adapter_vs_icil"] for r in rows])),
        "latency_task": next(iter(prompts)), "latency_measured_instances": k,
        "latency_s_per_100": {m: v * 100 / len(first["def_pos2"]) for m, v in lat.items()},
        "latency_ratio_adapter_vs_def_pos2": lat["adapter"] / lat["def_pos2"],
        "latency_ratio_adapter_vs_icil": lat["adapter"] / lat["icil"],
        "mean_flops_ratio_adapter_fusion_vs_adapter": float(np.mean([r["adapter_fusion_vs_adapter"] for r in rows])),
        "mean_flops_ratio_adapter_fusion_vs_def_pos2": float(np.mean([r["adapter_fusion_vs_def_pos2"] for r in rows])),
        "latency_ratio_adapter_fusion_vs_adapter": lat["adapter_fusion"] / lat["adapter"],
        "latency_ratio_adapter_fusion_vs_def_pos2": lat["adapter_fusion"] / lat["def_pos2"],
    }
    print(json.dumps({"per_task": rows, "summary": summary}, indent=1))
    print(f"\n{'task':48} {'adapter GF':>10} {'def_pos2 GF':>11} {'ICIL GF':>9} {'ad/d2':>6} {'ad/ICIL':>7}")
    for r in rows:
        g = r["gflops"]
        print(f"{r['task'][:48]:48} {g['adapter']:10.1f} {g['def_pos2']:11.1f} {g['icil']:9.1f} "
              f"{r['adapter_vs_def_pos2']:6.2f} {r['adapter_vs_icil']:7.2f}")
    print(f"mean FLOPs ratio (engine batches, padding included) adapter/def_pos2 "
          f"{summary['mean_flops_ratio_adapter_vs_def_pos2']:.2f}, adapter/ICIL {summary['mean_flops_ratio_adapter_vs_icil']:.2f}; "
          f"unpadded adapter/def_pos2 {summary['mean_unpadded_flops_ratio_adapter_vs_def_pos2']:.2f}, "
          f"adapter/ICIL {summary['mean_unpadded_flops_ratio_adapter_vs_icil']:.2f}; latency ratio (task {summary['latency_task']}, "
          f"{k} instances measured) adapter/def_pos2 {summary['latency_ratio_adapter_vs_def_pos2']:.2f}, "
          f"adapter/ICIL {summary['latency_ratio_adapter_vs_icil']:.2f}. {note}")
    print(f"fusion (instruction as a cached prefix of the adapted model): FLOPs adapter+fusion/adapter "
          f"{summary['mean_flops_ratio_adapter_fusion_vs_adapter']:.2f}, adapter+fusion/def_pos2 "
          f"{summary['mean_flops_ratio_adapter_fusion_vs_def_pos2']:.2f}; latency adapter+fusion/adapter "
          f"{summary['latency_ratio_adapter_fusion_vs_adapter']:.2f}, adapter+fusion/def_pos2 "
          f"{summary['latency_ratio_adapter_fusion_vs_def_pos2']:.2f}")


if __name__ == "__main__":
    main()
