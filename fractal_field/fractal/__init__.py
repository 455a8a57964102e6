"""Measuring fractality: box-counting dimension, the fractal transformation `T_r` with its
discrete-scale-invariance report, the segment graph and phase flow of gradients.

```python
from fractal_field import fractal

fractal.box_counting_dimension(x, threshold="mean").D
fractal.scale_invariance(model.cell.conv.conv.weight, r0=4, lam=2, num=3).holds
```

Everything but the phase-flow probe works on numpy arrays (JAX arrays are converted) and
returns plain numbers, so it applies to the weights of any model.
"""

from ._box import (
    BoxCounting as BoxCounting,
    box_counting_dimension as box_counting_dimension,
    count_boxes as count_boxes,
    default_scales as default_scales,
)
from ._graph import (
    FEATURES as FEATURES,
    kernel_adjacency as kernel_adjacency,
    segment_features as segment_features,
    segment_graph as segment_graph,
)
from ._phase import (
    classifier_loss as classifier_loss,
    log_phase_flow as log_phase_flow,
    segment_grad_norms as segment_grad_norms,
    tile_norms as tile_norms,
)
from ._segment import (
    ScaleInvariance as ScaleInvariance,
    as_matrix as as_matrix,
    dsi_scales as dsi_scales,
    scale_invariance as scale_invariance,
    segment as segment,
    segment_dimensions as segment_dimensions,
    segment_grid as segment_grid,
)
from ._threshold import Quantile as Quantile, magnitude as magnitude, occupancy as occupancy
