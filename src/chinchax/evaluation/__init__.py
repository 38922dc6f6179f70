"""Evaluation and interoperability: held-out loss (`evaluate`), the lm-evaluation-harness model
(`lm_eval_model`; its command is chinchax.lm_eval_adapter), Hugging Face GPT-2 and Llama import and export
(`hf`).

May import: every folder below it (config … dryrun).
"""
