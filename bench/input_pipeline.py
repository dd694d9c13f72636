"""Can the input pipeline feed training? Super-NI mixture examples/s vs SmolLM2-135M training examples/s.

Measures, in one run on the same batch shape:
  tokenize  seqio/tf.data tokenization of the Super-NI training tasks (def_pos2 prompts with Tk-Instruct's
            demo budget of --max_input_len tokens, SmolLM2 tokenizer), TensorFlow limited to 2 threads:
            a one-time cost per run (cached afterwards);
            also the same ids through `materialize_task`'s default Python path (no tf.data);
  batches   MixtureBatches building numpy batches from the tokenized tasks (the steady-state producer);
  train     one jitted forward + backward (jax.value_and_grad of the target-token cross-entropy on
            `pretrained.model.apply`) of SmolLM2-135M-Instruct on those batches (the consumer).
Prints examples/s of each and the ratios producer / consumer (> 1: the pipeline keeps up).

    python bench/input_pipeline.py [--data_dir ../shared/data/superni] [--batch 4] [--max_input_len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "superni"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max_input_len", type=int, default=512)
    parser.add_argument("--max_target_len", type=int, default=64)
    parser.add_argument("--max_tasks", type=int, default=40, help="training tasks in the mixture (0: all on disk)")
    parser.add_argument("--batches", type=int, default=200, help="batches timed for the producer")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed (after one compile step)")
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.set_visible_devices([], "GPU")

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlm
    from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length
    from jaxlm.data.batches import build_mixture_batches, materialize_task
    from jaxlm.data.mixtures import mixture_from_tasks
    from jaxlm.data.sources import load_tasks
    from jaxlm.data.tasks import register_task_data
    from jaxlm.data.vocab import TokenizerVocabulary

    pretrained = jaxlm.load_pretrained("smollm2-135m-instruct")
    vocab = TokenizerVocabulary(pretrained.tokenizer, name="smollm2")
    tasks = load_tasks("superni", args.data_dir, part="train")
    chosen = sorted(tasks)[: args.max_tasks] if args.max_tasks else sorted(tasks)
    names = [register_task_data(tasks[t], vocabulary=vocab, fmt="def_pos2", source_budget=args.max_input_len) for t in chosen]

    start = time.perf_counter()
    num_examples = sum(materialize_task(n, "train", via="seqio").num_examples for n in names)
    tokenize_eps = num_examples / (time.perf_counter() - start)
    start = time.perf_counter()
    sum(materialize_task(n, "train").num_examples for n in names)  # the same ids without tf.data
    python_tokenize_eps = num_examples / (time.perf_counter() - start)

    mixture_from_tasks("bench_superni_train", names, "proportional", cap=100)
    batches = build_mixture_batches("bench_superni_train", batch_size=args.batch, max_input_len=args.max_input_len,
                              max_target_len=args.max_target_len, seed=0)
    first = next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    batch_eps = args.batches * args.batch / (time.perf_counter() - start)

    model = pretrained.model

    def loss_fn(params, ids, labels, weights, mask, positions):
        logits = model.apply({"params": params}, ids, mask, positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    # The longest shape the pipeline yields (its largest bucket here), so the rate is a lower bound.
    width = bucket_length(args.max_input_len + args.max_target_len, DEFAULT_LENGTH_BUCKETS)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
    feed = [pad(first[k]) for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")]
    mask = pad(first["decoder_segment_ids"]) > 0
    step_args = (*feed, mask, pad(first["decoder_positions"]))
    jax.block_until_ready(grad_step(pretrained.params, *step_args))
    start = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(grad_step(pretrained.params, *step_args))
    train_eps = args.steps * args.batch / (time.perf_counter() - start)

    print(json.dumps({
        "device": str(jax.devices()[0].device_kind), "tasks": len(names), "examples": num_examples,
        "batch": args.batch, "train_length": width,
        "tokenize_examples_per_s": round(tokenize_eps, 1), "python_tokenize_examples_per_s": round(python_tokenize_eps, 1),
        "batches_examples_per_s": round(batch_eps, 1),
        "train_examples_per_s": round(train_eps, 2),
        "tokenize_over_train": round(tokenize_eps / train_eps, 2),
        "python_tokenize_over_train": round(python_tokenize_eps / train_eps, 2),
        "batches_over_train": round(batch_eps / train_eps, 2),
    }))


if __name__ == "__main__":
    main()
