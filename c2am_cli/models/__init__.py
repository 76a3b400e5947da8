"""The model: timm backbone, activation head, C2AM, the contrastive loss."""
