"""The registered model: a base causal LM + a LoRA adapter (or a merged model), as an MLflow pyfunc (models-from-code).

A merged model (the export stage) is logged with the artifact ``model`` instead of ``adapter`` and loads on its own.

``pipeline.tracking.log_adapter_model`` logs this file as the model's code, the adapter folder (PEFT weights + the
tokenizer with its chat template) as the artifact ``adapter``, and the base model in ``model_config``, whose keys
can be overridden at load time (``mlflow.pyfunc.load_model(uri, model_config={"base_model": "/local/copy"})``):

- ``base_model``: hub id or local folder of the base; ``revision``: its pinned commit, or null
- ``system_prompt``: prepended when a conversation has no system turn (the Qwen template would inject an English one)
- ``max_new_tokens`` (64), ``dtype`` (``auto`` = bfloat16 on a GPU that supports it, else float32; or ``bfloat16`` /
  ``float16`` / ``float32``), ``device`` (``auto`` = cuda when available, else cpu; or a torch device string)

``predict`` takes ``{"prompt": [text, …]}``, ``{"messages": [{"role", "content"}, …]}`` (one conversation), a list of
such records or a DataFrame with a ``prompt`` and/or a ``messages`` column (what the REST server hands over): the
model's signature (``model_registry.signature()``) declares these, and MLflow's schema check turns a bare list of
texts into an empty frame, so wrap texts as ``{"prompt": [...]}``. It returns the continuation of each, new text
only: greedy, or sampled when the ``temperature`` param is above 0 (``top_p`` too); ``max_new_tokens`` overrides the
config's.
The file imports nothing from ``pipeline``: MLflow runs it on its own when the model is loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULTS = {"base_model": None, "revision": None, "system_prompt": None, "max_new_tokens": 64, "dtype": "auto",
            "device": "auto"}


class AdapterModel(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        config = {**DEFAULTS, **{k: v for k, v in (context.model_config or {}).items() if v is not None}}
        merged = context.artifacts.get("model")  # a merged model carries its own weights: no base, no adapter
        if not merged and not config["base_model"]:
            raise ValueError("model_config['base_model'] is empty: pass the base's hub id or local folder")
        self.system_prompt = config["system_prompt"]
        self.max_new_tokens = int(config["max_new_tokens"])
        device = config["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = config["dtype"]
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        adapter = merged or context.artifacts["adapter"]
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        self.tokenizer.padding_side = "left"  # batched generation continues each row from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(merged or config["base_model"],
                                                    revision=None if merged else config["revision"],
                                                    dtype=getattr(torch, dtype), device_map=device,
                                                    use_safetensors=True)
        self.model = (base if merged else PeftModel.from_pretrained(base, adapter)).eval()
        eos = base.generation_config.eos_token_id if base.generation_config else None
        # Plain greedy decoding: the hub's sampling settings (temperature, top_p, repetition_penalty) are not inherited.
        self.generation_config = GenerationConfig(do_sample=False, eos_token_id=eos or self.tokenizer.eos_token_id,
                                                  pad_token_id=self.tokenizer.pad_token_id)

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        conversations = [self._conversation(item) for item in _items(model_input)]
        if not conversations:
            return []
        texts = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.model.device)
        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(params.get("temperature") or 0.0)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": float(params.get("top_p") or 1.0)} \
            if temperature > 0 else {}
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self.generation_config, max_new_tokens=max_new_tokens,
                                      **sampling)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _conversation(self, item: Any) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else [dict(m) for m in item]
        if self.system_prompt and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def _items(model_input: Any) -> list[Any]:
    """Prompts or conversations from the accepted input shapes."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame, as the REST server passes it: per row a prompt or messages
        if not {"prompt", "messages"} & set(model_input.columns):
            raise ValueError(f"the input needs a 'prompt' or 'messages' column; got {list(model_input.columns)}: pass "
                             f'{{"prompt": ["…"]}} or {{"messages": [{{"role": "user", "content": "…"}}]}}')
        items = [item for row in model_input.to_dict("records") for item in _row(row)]
        return [item if isinstance(item, str) else [dict(m) for m in item] for item in items]
    elif isinstance(model_input, dict):
        items = model_input.get("prompt", model_input.get("messages"))
        if items is None:
            raise ValueError(f"a dict input needs a 'prompt' key; got {list(model_input)}")
    else:
        items = model_input
    if isinstance(items, str):
        return [items]
    items = list(items)
    if items and isinstance(items[0], dict):  # a single conversation
        return [items]
    return [item if isinstance(item, str) else list(item) for item in items]


def _row(row: dict[str, Any]) -> list[Any]:
    """One DataFrame row: its prompt (text) or its messages (a conversation), whichever it has. MLflow turns a dict of
    lists (``{"prompt": ["a", "b"]}``) into one row holding the lists: they are unpacked here."""
    prompt, messages = row.get("prompt"), row.get("messages")
    if isinstance(prompt, str):
        return [prompt]
    if prompt is not None and not isinstance(prompt, float) and len(prompt):  # float: pandas' NaN for a missing cell
        return [str(p) for p in prompt]
    if messages is not None and not isinstance(messages, float) and len(messages):
        many = not isinstance(messages[0], dict)  # a list of conversations rather than one conversation
        return [list(c) for c in messages] if many else [list(messages)]
    raise ValueError(f"a row needs a 'prompt' (text) or 'messages' (a list of {{role, content}}); got {row}")


mlflow.models.set_model(AdapterModel())
