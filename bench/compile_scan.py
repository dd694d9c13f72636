"""Compile time of a Llama train step with the layers unrolled (jaxlm's model) vs scanned (`nn.scan`).

Issue 18, item 3: does scanning the blocks cut compile time enough to adopt it? The scanned model
here is a measurement harness, not a second model: it runs jaxlm's own `LlamaBlock` under
`nn.scan` (params stacked on a leading layer axis), with the same embedding, final norm and tied
head, no cache and no LoRA. Both programs are lowered and compiled for a (batch, seq) token batch,
`jax.value_and_grad` of the mean next-token cross-entropy; the compiled programs are also run once
so the loss of the two layouts can be compared (same weights: the scanned params are the unrolled
ones stacked).

    python bench/compile_scan.py [--layers 30] [--batch 4] [--seq 256]    (SmolLM2-135M's other shapes)

Prints the lowering and compile seconds of each, their ratio, and the loss difference.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.models.layers import Embed, RMSNorm
from jaxlm.models.llama import Llama, LlamaBlock, LlamaConfig, attention_bias


class ScannedLlama(nn.Module):
    """jaxlm's LlamaBlock scanned over `num_layers` (params 'layers' with a leading layer axis)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        b, length = ids.shape
        mask = jnp.ones((b, length), bool)
        positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        bias = attention_bias(mask, 0, length, dt, c.sliding_window, None)
        embed = Embed(c.vocab_size, c.hidden_size, dt, pdt, name="embed_tokens")
        x = embed(ids)

        def body(block, carry, _):
            out, _ = block(carry, positions, bias, None, 1.0)
            return out, None

        scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers)
        x, _ = scanned(LlamaBlock(c, name="layers"), x, None)
        x = RMSNorm(c.rms_norm_eps, dt, pdt, name="norm")(x)
        return embed.attend(x).astype(jnp.float32)


def loss_fn(apply, params, ids):
    logits = apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def compile_seconds(fn, *args) -> tuple[float, float, object]:
    t = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    return t_lower, time.perf_counter() - t, compiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="blocks (default 30, SmolLM2-135M's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=args.layers,
                         num_heads=9, num_kv_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    unrolled = Llama(config)
    params = jax.jit(lambda: unrolled.init(jax.random.PRNGKey(0), ids[:, :8])["params"])()
    params = nn.unbox(params)
    stacked = {"embed_tokens": params["embed_tokens"], "norm": params["norm"],
               "layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                                *[params[f"layers_{i}"] for i in range(args.layers)])}
    scanned = ScannedLlama(config)
    rows = {}
    for name, model, p_ in (("unrolled", unrolled, params), ("scanned", scanned, stacked)):
        step = jax.value_and_grad(lambda q, x, m=model: loss_fn(m.apply, q, x))
        lower, comp, compiled = compile_seconds(step, p_, ids)
        loss, _ = compiled(p_, ids)
        rows[name] = (lower, comp, float(loss))
        print(f"{name:9s} lower {lower:6.2f} s  compile {comp:6.2f} s  loss {float(loss):.6f}", flush=True)
    (lu, cu, loss_u), (ls, cs, loss_s) = rows["unrolled"], rows["scanned"]
    print(f"\n{args.layers} layers, batch {args.batch} x {args.seq}: lower+compile unrolled {lu + cu:.1f} s, "
          f"scanned {ls + cs:.1f} s, ratio {(lu + cu) / (ls + cs):.2f}x; |loss difference| {abs(loss_u - loss_s):.2e}")


if __name__ == "__main__":
    main()
