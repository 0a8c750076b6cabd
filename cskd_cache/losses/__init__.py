"""Losses, one per file (as dinov2/loss/), and the two objectives that weigh them: `align.AlignLoss` (Stage I) and
`iaa.IAALoss` (Stage II).

| name        | file                | compares                                         | used by                       |
|-------------|---------------------|--------------------------------------------------|-------------------------------|
| ``global``  | cosine.py           | projected embedding vs cached embedding, 1 - cos | align (1.0); distill lambda_f |
| ``token``   | token_smooth_l1.py  | token head vs LayerNorm-whitened cached tokens   | align (1.0 with tokens)       |
| ``mse``     | mse.py              | projected embedding vs cached embedding, MSE     | align (0.0)                   |
| ``sup``     | emd.py / MSE        | score distribution (EMD) or 0..1 score (MSE)     | finetune, distill             |
| ``plcc``    | plcc_loss.py        | 1 - PLCC of a batch's scores                     | finetune, distill (0.0)       |
| ``distill`` | emd.py / kl.py      | student vs teacher prediction on the same view   | distill (lambda_u)            |
| ``consistency`` | consistency.py  | a second jitter's prediction vs the first's      | distill (--consistency, 0)    |
| ``attn_distance`` | attention_distance.py | per-layer attention distance vs the start's | distill (--attn-distance, 0) |

Pure torch.

May import: `errors`. Never: anything else of cskd.
"""

from __future__ import annotations

from .align import AlignLoss
from .cosine import CosineLoss
from .mse import MSELoss
from .token_smooth_l1 import TokenSmoothL1Loss

__all__ = ["AlignLoss", "CosineLoss", "MSELoss", "TokenSmoothL1Loss"]
