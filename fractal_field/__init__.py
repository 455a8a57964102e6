"""fractal-field: deep-equilibrium fractal neural fields in JAX/Equinox."""

from . import fractal as fractal
from ._activation import (
    LIPSCHITZ as LIPSCHITZ,
    Cardioid as Cardioid,
    CReLU as CReLU,
    ModReLU as ModReLU,
    PhaseTanh as PhaseTanh,
    ZReLU as ZReLU,
    cardioid as cardioid,
    crelu as crelu,
    modrelu as modrelu,
    phase_tanh as phase_tanh,
    zrelu as zrelu,
)
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    JacobianFreeAdjoint as JacobianFreeAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
    backward_stats_probe as backward_stats_probe,
)
from ._anytime import (
    AnytimeTrace as AnytimeTrace,
    anytime_trace as anytime_trace,
    solve_early_exit as solve_early_exit,
)
from ._cell import FractalCell as FractalCell
from ._checkpoint import (
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._complex_opt import (
    complex_safe as complex_safe,
    conjugate_complex_grads as conjugate_complex_grads,
)
from ._config import load_config as load_config
from ._contraction import ContractiveToroidalConv as ContractiveToroidalConv
from ._conv import ToroidalConv as ToroidalConv, with_precision as with_precision
from ._distributed import (
    EXIT_PROCESS_LOST as EXIT_PROCESS_LOST,
    ConfigMismatchError as ConfigMismatchError,
    check_processes_agree as check_processes_agree,
    initialize_distributed as initialize_distributed,
)
from ._energy import AbstractEnergyMap as AbstractEnergyMap
from ._equilibrium import EquilibriumPropagation as EquilibriumPropagation
from ._export import export_classifier as export_classifier, export_onnx as export_onnx
from ._fixed_point import fixed_point as fixed_point
from ._head import Bottleneck as Bottleneck, PyramidHead as PyramidHead
from ._inpaint import (
    InpaintField as InpaintField,
    InpaintMap as InpaintMap,
    load_inpaint as load_inpaint,
    save_inpaint as save_inpaint,
    train_inpaint as train_inpaint,
)
from ._jacobian import jacobian_penalty as jacobian_penalty
from ._kron_graph import kron_adjacency as kron_adjacency, kron_labels as kron_labels
from ._kron_net import KroneckerNet as KroneckerNet
from ._model import (
    PRESETS as PRESETS,
    Encoder as Encoder,
    FieldClassifier as FieldClassifier,
    Readout as Readout,
    count_params as count_params,
    make_model as make_model,
    param_summary as param_summary,
)
from ._multiscale import (
    MultiScaleCell as MultiScaleCell,
    MultiScaleOperator as MultiScaleOperator,
)
from ._norm import ComplexGroupNorm as ComplexGroupNorm
from ._planar import (
    PlanarSpectralOperator as PlanarSpectralOperator,
    from_planar as from_planar,
    to_planar as to_planar,
)
from ._quant import (
    QuantisedArray as QuantisedArray,
    contraction_report as contraction_report,
    dequantise as dequantise,
    model_nbytes as model_nbytes,
    quantise as quantise,
)
from ._solution import RESULTS as RESULTS, Solution as Solution, Stats as Stats
from ._solver import (
    AbstractFixedPointSolver as AbstractFixedPointSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    Multigrid as Multigrid,
    Naive as Naive,
    Reversible as Reversible,
    chebyshev_damping as chebyshev_damping,
)
from ._symmetric import (
    ENERGY_ACTIVATIONS as ENERGY_ACTIVATIONS,
    BoundSymmetricCell as BoundSymmetricCell,
    SymmetricCell as SymmetricCell,
)
from ._tapconv import toroidal_correlate as toroidal_correlate
from ._train import (
    evaluate as evaluate,
    export_model as export_model,
    load_model as load_model,
    run_summary as run_summary,
    train as train,
)
from ._twin import equal_params_channels as equal_params_channels
from ._version import __version__ as __version__
