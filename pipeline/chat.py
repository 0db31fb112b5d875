"""chat: `make chat` — talk to a trained model in the terminal, several turns, the answer streamed as it is generated.

``python -m pipeline.chat --model REF [--hw NAME] [--set model=…] [--max-new-tokens N] [--temperature T] [--top-p P]
[--repetition-penalty R] [--seed S] [--system TEXT] [--prompt TEXT] [--show-template]``
REF is a registered model (``zh-align-merged@champion``, ``zh-align-orpo/3``: an adapter or a merged model), a run id
(the newest version that run registered) or a local folder (a merged model, or an adapter). An adapter loads on the
base of the configured model definition (HW / SET model=…, as `make pull` checks it). The system prompt is the one
registered with the model, else the model definition's zh prompt; ``--system`` replaces it. Each turn goes through the
model's chat template with the whole conversation so far. Commands: ``/reset`` (forget the conversation), ``/system
TEXT`` (a new system prompt, conversation forgotten), ``/exit``. ``--prompt`` answers once and exits (for scripts);
``--show-template`` prints each rendered prompt to stderr. Temperature 0 decodes greedily.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.strict import parse_overrides
from pipeline.models.loading import base_of, load_for_generation
from pipeline.stage.cli import add_common, guarded, setup_logging
from pipeline.stage.resolve import resolve
from pipeline.tracking import lineage, model_registry

log = logging.getLogger("pipeline.chat")
HELP = "commands: /reset (forget the conversation) · /system TEXT (new system prompt) · /exit"


@dataclass
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    seed: int | None = None

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens (MAX_NEW_TOKENS) must be at least 1; got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature (TEMPERATURE) must be 0 (greedy) or more; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p (TOP_P) must be in (0, 1]; got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty (REPETITION_PENALTY) must be above 0; got {self.repetition_penalty}")
        if problems:
            raise ConfigError(problems)

    def generate_kwargs(self) -> dict[str, Any]:
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0 \
            else {"do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty, **sampling}


def find_model(ref: str, hw: str, overrides: list) -> dict[str, Any]:
    """The model to load: ``{"folder", "adapter", "system_prompt", "source", "model" (the model definition)}``."""
    if not ref.strip():
        raise ConfigError(["no model given: MODEL=name@alias (e.g. zh-align-merged@champion), name/version, a run id "
                           "or a folder"])
    r = resolve("export", hw=hw, overrides=overrides)  # the model definition of this profile, as `make pull` reads it
    path = Path(ref)
    if path.is_dir():
        adapter = (path / "adapter_config.json").is_file()
        if not adapter and not (path / "config.json").is_file():
            raise StageError(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)")
        found = {"folder": path, "adapter": adapter, "system_prompt": None, "source": str(path), "base_model": ""}
    elif path.parent != Path(".") and not ref.rpartition("/")[2].isdigit():
        raise StageError(f"folder {ref} does not exist; give a folder, `name@alias`, `name/version` or a run id")
    else:
        found = model_registry.download(ref)
    model = r.model
    if found["adapter"]:
        recorded = found["base_model"] or lineage.config_base(found["folder"])
        model = base_of(recorded, r.model, overrides)
        if model is None:
            raise StageError(f"{ref} is an adapter of base {recorded!r}, but the configured base is "
                             f"{r.model.hub_id or r.model.name} (model {r.model.name}, HW={r.hw.name}); pick the "
                             f"profile or model it was trained for (HW=…, SET=\"model=…\")")
        if model is not r.model:
            log.info("%s is an adapter of %s: loaded on that model definition (SET=\"model=…\" names another)",
                     ref, model.name)
    return {**found, "system_prompt": found["system_prompt"] or model.system_prompt, "model": model}


class Chat:
    """A conversation with one loaded model: the turns so far, rendered through the model's chat template."""

    def __init__(self, net: Any, tokenizer: Any, system: str, settings: Settings, show_template: bool = False,
                 out: TextIO | None = None) -> None:
        self.net, self.tokenizer, self.settings = net, tokenizer, settings
        self.show_template, self.out = show_template, out or sys.stdout
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str) -> str:
        """One turn: the user's text added, the reply streamed to ``out`` and added to the conversation."""
        import torch
        from transformers import TextStreamer

        self.messages.append({"role": "user", "content": text})
        batch = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_dict=True,
                                                   return_tensors="pt").to(self.net.device)
        if self.show_template:
            print("[template] " + self.tokenizer.decode(batch["input_ids"][0]).replace("\n", "\\n"), file=sys.stderr,
                  flush=True)
        if self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: print(chunk, end="" if not stream_end else "\n",
                                                                          file=self.out, flush=True)
        with torch.inference_mode():
            ids = self.net.generate(**batch, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                                    **self.settings.generate_kwargs())
        reply = self.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str) -> bool:
        """Handle one input line; False when the chat should end."""
        text = line.strip()
        if text in ("/exit", "/quit"):
            return False
        if text == "/reset":
            self.reset()
            print("(conversation cleared · 对话已清空)", file=self.out, flush=True)
        elif text == "/system" or text.startswith("/system "):
            self.system = text.removeprefix("/system").strip()
            self.reset()
            print(f"(system prompt set, conversation cleared · 已设置系统提示: {self.system or '(none)'})", file=self.out,
                  flush=True)
        elif text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=self.out, flush=True)
        elif text:
            self.answer(text)
        return True


def loop(chat: Chat, stdin: TextIO, interactive: bool) -> None:
    """Read lines until /exit or the end of the input."""
    while True:
        if interactive:
            print("\n你 › ", end="", file=chat.out, flush=True)
        line = stdin.readline()
        if not line or not chat.command(line):
            return


def quiet() -> None:
    """A chat screen without the loading progress bar and PEFT's deprecation notice."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION, a run id, or a folder")
    add_common(parser)
    defaults = Settings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling (same answers for the same input)")
    parser.add_argument("--system", default=None, help="the system prompt (default: the model's zh prompt)")
    parser.add_argument("--prompt", default="", help="answer this once and exit")
    parser.add_argument("--show-template", action="store_true", help="print each rendered prompt to stderr")
    args = parser.parse_args(argv)
    setup_logging()

    def go() -> None:
        settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty, args.seed)
        settings.check()
        found = find_model(args.model, args.hw, parse_overrides(args.set, args.overrides))
        quiet()
        net, tokenizer = load_for_generation(found["folder"], found["adapter"], found["model"])
        system = found["system_prompt"] if args.system is None else args.system
        chat = Chat(net, tokenizer, system, settings, args.show_template)
        if args.prompt:
            chat.answer(args.prompt)
            return
        interactive = sys.stdin.isatty()
        if interactive:
            kind = "adapter on " + (found["model"].hub_id or found["model"].name) if found["adapter"] else "model"
            print(f"{found['source']} ({kind}) · {HELP}", flush=True)
        loop(chat, sys.stdin, interactive)

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
