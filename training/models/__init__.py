"""Classifier architectures: ``factory.build_model`` (timm ConvNeXt variants, the SPARCS VGG baseline)."""
