"""An lm-evaluation-harness model for chinchax runs, registered as `chinchax` (needs the `eval` extra).

lm-eval 0.4.x finds models only in its own registry: it has no entry-point discovery, and --include_path adds
tasks, not models. So the model is registered when this module is imported, and the command below imports it
and then runs lm-eval's own command line (same arguments as `lm_eval`):

    python -m chinchax.lm_eval_adapter --model chinchax --model_args workdir=DIR[,step=N] --tasks ...
    python -m chinchax.lm_eval_adapter --model chinchax --model_args workdir=DIR --tasks cerebras_gpt_5shot

(the command is chinchax/lm_eval_adapter.py). From Python: `import chinchax.evaluation.lm_eval_model` before
`lm_eval.simple_evaluate(model="chinchax", ...)`, or
pass `ChinchaxLM(cfg=cfg, params=params)` as the model. The presets `cerebras_gpt_0shot` and
`cerebras_gpt_5shot` are the seven tasks of the Cerebras-GPT paper (Dey et al. 2023, Table 3/4).

Scoring follows lm-eval's `hf` model: context + continuation truncated from the left to max_length + 1
tokens, an empty context replaced by the EOS token, rolling windows for perplexity tasks, greedy or sampled
generation with the KV cache until a stop sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from chinchax.data import get_tokenizer
from chinchax.model import gpt, sample

CEREBRAS_GPT_TASKS = (
    "hellaswag",
    "piqa",
    "winogrande",
    "lambada_openai",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
# preset name -> (tasks, few-shot examples)
PRESETS = {
    "cerebras_gpt_0shot": (CEREBRAS_GPT_TASKS, 0),
    "cerebras_gpt_5shot": (CEREBRAS_GPT_TASKS, 5),
}


@functools.partial(jax.jit, static_argnums=0)
def _score(model, params, inputs, targets, mask):
    """Per row: the summed log-probability of `targets` where `mask`, and whether all are the argmax."""
    logits = gpt.build(model).apply({"params": params}, inputs)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, target_log_probs, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


@register_model("chinchax")
class ChinchaxLM(TemplateLM):
    """A chinchax checkpoint (model_args workdir=DIR[,step=N]) or in-memory (cfg, params) as an lm-eval LM."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        cfg: ml_collections.ConfigDict | None = None,
        params=None,
        **lm_eval_kwargs,
    ):
        super().__init__()
        unknown = sorted(set(lm_eval_kwargs) - {"device", "max_batch_size"})
        if unknown:
            raise ValueError(f"chinchax model_args: unknown argument(s) {unknown}")
        if (workdir is None) == (cfg is None or params is None):
            raise ValueError("chinchax model_args: give workdir=DIR, or pass cfg and params from Python")
        if workdir is not None:
            from chinchax.training import checkpoint

            cfg, params = checkpoint.load_params(workdir, None if step is None else int(step))
        self.cfg = cfg
        self.params = params
        self.model = ml_collections.FrozenConfigDict(cfg.model)
        self.tokenizer_ = get_tokenizer(cfg.data.tokenizer)
        self.max_length = int(max_length or cfg.model.max_positions)
        if not 1 < self.max_length <= cfg.model.max_positions:
            raise ValueError(f"max_length={max_length} must be in 2..{cfg.model.max_positions}")
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        del add_special_tokens, kwargs  # GPT-2-style: no BOS is added
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) per (key, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval request with an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="chinchax loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            length = sample.bucket(len(rows[chosen[0]][0]), self.max_length)
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros_like(inputs)
            mask = np.zeros(inputs.shape, bool)
            for row, i in enumerate(chosen):
                ids, shifted, scored = rows[i]
                inputs[row, : len(ids)] = ids
                targets[row, : len(ids)] = shifted
                mask[row, len(ids) - scored : len(ids)] = True
            log_probs, greedy = _score(self.model, self.params, inputs, targets, mask)
            for row, i in enumerate(chosen):
                results[i] = (float(log_probs[row]), bool(greedy[row]))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chosen))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each whole text, scored in disjoint windows of max_length tokens."""
        totals = []
        for (text,) in tqdm([r.args for r in requests], desc="chinchax rolling", disable=disable_tqdm):
            windows = [
                (None, *lm_eval_utils.make_disjoint_window(w))
                for w in lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations (KV-cache decoding) cut at the first stop sequence; greedy unless do_sample."""
        eos_text = self.tok_decode([self.eot_token_id])
        outputs = []
        for index, (context, gen_kwargs) in enumerate(
            tqdm([r.args for r in requests], desc="chinchax generate", disable=disable_tqdm)
        ):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
            sampling = sample.Sampling(
                temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
                vocab_size=self.tokenizer_.vocab_size,
            )
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new) :]
            tokens = sample.generate(
                self.cfg.model,
                self.params,
                prompt,
                max_new,
                sampling,
                seed=self.seed + index,
                stop_tokens=[self.eot_token_id],
                stop_when=lambda ids, until=until: any(s in self.tok_decode(ids) for s in until),
            )[0]
            text = postprocess_generated_text(self.tok_decode(tokens), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs
