"""Peer methods built in for comparison on the same data: TokenCut (normalized cut on a ViT's keys) and LOST."""
