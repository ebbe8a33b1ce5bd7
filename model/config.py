"""The GPT-2 architecture's hyper-parameters, with the four published sizes as presets."""

from __future__ import annotations

from dataclasses import dataclass

from model.validation import DictFields, is_int, is_number


class ConfigError(ValueError):
    """An architecture configuration that cannot describe a GPT-2 model."""


@dataclass(frozen=True)
class GPTConfig(DictFields):
    """Sizes of a GPT-2 model. The defaults are the 124M `gpt2`."""

    unknown_keys_error = ConfigError
    unknown_keys_label = "unknown config keys"

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # number of learned positions (HF: n_positions)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        eps = self.layer_norm_epsilon
        if not is_number(eps) or not 0 < eps < 1:
            raise ConfigError(f"layer_norm_epsilon must be in (0, 1), got {eps!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        """Parameter count with the head tied to the token embedding (counted once)."""
        c = self.n_embd
        per_block = 12 * c * c + 13 * c  # qkv, proj, fc, fc-proj weights and biases, two LNs
        return self.vocab_size * c + self.block_size * c + self.n_layer * per_block + 2 * c

    @classmethod
    def from_preset(cls, name: str) -> GPTConfig:
        """One of the published sizes: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            known = ", ".join(PRESETS)
            raise ConfigError(f"unknown model preset {name!r}; known presets: {known}") from None


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
