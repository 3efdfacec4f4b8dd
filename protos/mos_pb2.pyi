from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GramEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAM_ENCODING_UNSPECIFIED: _ClassVar[GramEncoding]
    PACKED_UPPER: _ClassVar[GramEncoding]
    TRIANGULAR_FACTOR: _ClassVar[GramEncoding]
GRAM_ENCODING_UNSPECIFIED: GramEncoding
PACKED_UPPER: GramEncoding
TRIANGULAR_FACTOR: GramEncoding

class TensorSpec(_message.Message):
    __slots__ = ("key", "shape", "dtype")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, key: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ConceptManifest(_message.Message):
    __slots__ = ("version", "name", "class_word", "base_fingerprint", "adapter_digest", "data_digest", "n_layers", "embedding_dim", "lora", "cached", "client_version", "embeddings", "trigger")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    version: int
    name: str
    class_word: str
    base_fingerprint: str
    adapter_digest: str
    data_digest: str
    n_layers: int
    embedding_dim: int
    lora: _containers.RepeatedCompositeFieldContainer[LoraLayer]
    cached: bool
    client_version: str
    embeddings: TensorSpec
    trigger: str
    def __init__(self, version: _Optional[int] = ..., name: _Optional[str] = ..., class_word: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., adapter_digest: _Optional[str] = ..., data_digest: _Optional[str] = ..., n_layers: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., lora: _Optional[_Iterable[_Union[LoraLayer, _Mapping]]] = ..., cached: _Optional[bool] = ..., client_version: _Optional[str] = ..., embeddings: _Optional[_Union[TensorSpec, _Mapping]] = ..., trigger: _Optional[str] = ...) -> None: ...

class ConceptEntry(_message.Message):
    __slots__ = ("name", "class_word", "embeddings", "trigger")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_word: str
    embeddings: TensorSpec
    trigger: str
    def __init__(self, name: _Optional[str] = ..., class_word: _Optional[str] = ..., embeddings: _Optional[_Union[TensorSpec, _Mapping]] = ..., trigger: _Optional[str] = ...) -> None: ...

class LoraLayer(_message.Message):
    __slots__ = ("name", "rank", "in_dim", "out_dim", "a", "b")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    IN_DIM_FIELD_NUMBER: _ClassVar[int]
    OUT_DIM_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    in_dim: int
    out_dim: int
    a: TensorSpec
    b: TensorSpec
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., in_dim: _Optional[int] = ..., out_dim: _Optional[int] = ..., a: _Optional[_Union[TensorSpec, _Mapping]] = ..., b: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

class SiteStats(_message.Message):
    __slots__ = ("site", "dim", "rows", "encoding", "tensor", "rank", "heldout")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_FIELD_NUMBER: _ClassVar[int]
    site: str
    dim: int
    rows: int
    encoding: GramEncoding
    tensor: TensorSpec
    rank: int
    heldout: bool
    def __init__(self, site: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., encoding: _Optional[_Union[GramEncoding, str]] = ..., tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., rank: _Optional[int] = ..., heldout: _Optional[bool] = ...) -> None: ...

class StagePayload(_message.Message):
    __slots__ = ("version", "stage", "concept", "base_fingerprint", "sites", "from_cache")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    version: int
    stage: int
    concept: str
    base_fingerprint: str
    sites: _containers.RepeatedCompositeFieldContainer[SiteStats]
    from_cache: bool
    def __init__(self, version: _Optional[int] = ..., stage: _Optional[int] = ..., concept: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., sites: _Optional[_Iterable[_Union[SiteStats, _Mapping]]] = ..., from_cache: _Optional[bool] = ...) -> None: ...

class FusedManifest(_message.Message):
    __slots__ = ("version", "stage", "base_fingerprint", "round", "concepts", "lora", "digest", "adapter_file", "one_shot", "gram_dtype", "sampling", "placement")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FILE_FIELD_NUMBER: _ClassVar[int]
    ONE_SHOT_FIELD_NUMBER: _ClassVar[int]
    GRAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    stage: int
    base_fingerprint: str
    round: int
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptEntry]
    lora: _containers.RepeatedCompositeFieldContainer[LoraLayer]
    digest: str
    adapter_file: TensorSpec
    one_shot: bool
    gram_dtype: str
    sampling: Sampling
    placement: str
    def __init__(self, version: _Optional[int] = ..., stage: _Optional[int] = ..., base_fingerprint: _Optional[str] = ..., round: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[ConceptEntry, _Mapping]]] = ..., lora: _Optional[_Iterable[_Union[LoraLayer, _Mapping]]] = ..., digest: _Optional[str] = ..., adapter_file: _Optional[_Union[TensorSpec, _Mapping]] = ..., one_shot: _Optional[bool] = ..., gram_dtype: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., placement: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("steps", "seed", "guidance", "heldout")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    seed: int
    guidance: float
    heldout: bool
    def __init__(self, steps: _Optional[int] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., heldout: _Optional[bool] = ...) -> None: ...

class TuneRequest(_message.Message):
    __slots__ = ("version", "base_fingerprint", "round", "one_shot", "known", "gram_dtype", "sampling", "placement")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ONE_SHOT_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    GRAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_fingerprint: str
    round: int
    one_shot: bool
    known: _containers.RepeatedScalarFieldContainer[str]
    gram_dtype: str
    sampling: Sampling
    placement: str
    def __init__(self, version: _Optional[int] = ..., base_fingerprint: _Optional[str] = ..., round: _Optional[int] = ..., one_shot: _Optional[bool] = ..., known: _Optional[_Iterable[str]] = ..., gram_dtype: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., placement: _Optional[str] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("version", "kind", "reason", "round")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: str
    reason: str
    round: int
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
