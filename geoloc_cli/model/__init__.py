"""Networks: the timm backbones, fusion and heads (network: add a backbone or a fusion here), the
segmenter (segmentation), published checkpoints converted (convert) and the ONNX export (export).
Single-device code: distribution is applied from outside (train.trainer). Imports: errors, data, geo,
dist (devices), inference (preprocessing and the export's runtime contract)."""
