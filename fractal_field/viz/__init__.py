"""Visualising fractal fields: domain colouring, the crystallisation of the field over solver
iterations, solver comparisons, animations, training curves, measures of fractality (box
counting, scale invariance, the segment graph, phase flow) and Kronecker layer graphs.

```python
from fractal_field import viz

traj, residuals, sol = viz.model_trajectory(model, x, solver=ff.Naive(), every=2)
viz.plot_evolution(traj, residuals=residuals, every=2, path="evolution_fractal.png")
viz.animate_field(traj, "field.gif", residuals=residuals, every=2)
```

Every figure function returns a `matplotlib.figure.Figure` (not registered with pyplot, so
nothing pops up) and saves it when given `path=`.
"""

from ._animate import animate_field as animate_field, field_frames as field_frames
from ._colour import (
    colour_wheel_legend as colour_wheel_legend,
    domain_colouring as domain_colouring,
    magnitude_scale as magnitude_scale,
)
from ._fractal import (
    plot_box_counting as plot_box_counting,
    plot_phase_flow as plot_phase_flow,
    plot_scale_invariance as plot_scale_invariance,
    plot_segment_graph as plot_segment_graph,
    read_phase_flow as read_phase_flow,
)
from ._kron import plot_edge_weights as plot_edge_weights, plot_kron_graph as plot_kron_graph
from ._plots import (
    first_of_each_class as first_of_each_class,
    plot_evolution as plot_evolution,
    plot_fixed_point_gallery as plot_fixed_point_gallery,
    plot_residuals as plot_residuals,
    plot_solver_comparison as plot_solver_comparison,
)
from ._solve import (
    compare_solvers as compare_solvers,
    default_solvers as default_solvers,
    work_per_step as work_per_step,
)
from ._training import plot_training as plot_training, read_jsonl as read_jsonl
from ._trajectory import (
    model_trajectory as model_trajectory,
    record_trajectory as record_trajectory,
    valid_residuals as valid_residuals,
)
