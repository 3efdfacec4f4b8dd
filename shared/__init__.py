"""What both sides use: base models, ED-LoRA concepts on them, sampling (regional too), the fusion, file formats,
the federation's wire, and the toy world. The names a library user needs:

    from mos.shared import load_base, load_adapter, ConceptModel, Region, sample_regional
    base = load_base("world")
    model = ConceptModel.from_adapter(base, load_adapter("fused/"))
    image = sample_regional(model, "a <alice> and a <bob>", regions=[Region("a <alice>", "", (0, 0, .5, 1)),
                                                                     Region("a <bob>", "", (.5, 0, 1, 1))])
"""

from mos.shared.runtime import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Base": "mos.shared.sd.base", "load_base": "mos.shared.sd.base",
    "Concept": "mos.shared.sd.concepts", "ConceptModel": "mos.shared.sd.model",
    "Adapter": "mos.shared.formats.adapter", "load_adapter": "mos.shared.formats.adapter:load",
    "save_adapter": "mos.shared.formats.adapter:save",
    "sample": "mos.shared.sampling.denoise", "sample_regional": "mos.shared.sampling.regional",
    "Region": "mos.shared.sampling.layout",
    "FusionConfig": "mos.shared.fusion.config", "Fusion": "mos.shared.fusion.driver",
    "run_fusion": "mos.shared.fusion.driver", "fuse": "mos.shared.fusion.local",
    "write_pipeline": "mos.shared.formats.export", "write_kohya": "mos.shared.formats.export",
})
