"""Every loss of the project, each a plain function on tensors (no imports from our files).

CLIP (Radford et al. 2021, Figure 3; Knowledge-CLIP Figure 2):
    logits = I_e @ T_e.T * exp(t)
    loss   = (CE(logits, arange(B), axis=0) + CE(logits, arange(B), axis=1)) / 2
"""
import torch
import torch.nn.functional as F


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE of the CLIP pseudocode.

    image_emb, text_emb: (B, D) L2-normalised embeddings; pair i is (image_emb[i], text_emb[i]).
    logit_scale: the already exponentiated temperature exp(t), a scalar tensor.
    Row i of `logits` scores image i against every caption (axis=1, image -> text); column j
    scores caption j against every image (axis=0, text -> image)."""
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
