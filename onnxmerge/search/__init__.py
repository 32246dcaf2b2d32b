"""Merging to an accuracy budget (`--max-loss`): the smallest (or fastest) merged model whose every
task stays within the budget on held-out data, found by searching methods and their settings.

The user states the budget (points of accuracy each task may lose) and gives labelled calibration
data per task. The search:
- holds out part of the calibration data (or takes `--validation`) to choose on: a candidate is
  never chosen on data it was calibrated on;
- starts from `pack` (shares nothing, exact: always within any budget, so there is always an answer);
- for every method that applies to the inputs and declares a search knob (`Method.search`: zipper's
  shared layers, mtz's share ratio, codebook's presets and codewords), bisects the knob's ladder for
  its most aggressive setting within the budget: along a ladder size (or latency) falls and accuracy
  falls or stays, so each trial halves what is left. Neighbouring settings of a method that can start
  from an earlier merged model (zipper) start from the calibrated model of the last setting that was
  within the budget (warm start);
- each composition of two methods (Method.composes: zipper's shared layers, then codebooks on the
  layers that stay per task) right after its first method (with --jobs: after every method), on
  that method's best setting within the budget, bisecting the second's knob; where the first can
  (Method.warm: zipper), every setting starts from the first's model as the search calibrated it,
  so the second's loss adds to a recovered model rather than to the raw merge; it is not tried
  where the first found no setting within the budget;
- tries first the methods whose knob saves what the objective asks for (`Knob.saves`), so that the
  pruning below has a strong model to compare with early;
- abandons early: a setting whose size (or latency), known before calibration, cannot beat the best
  model found so far is not calibrated; a model already within the budget before calibration is not
  calibrated either; a near miss (calibrated, over the budget by less than one standard error) where
  a method's bisection ends is calibrated once more from its merge with three times the steps, where
  the time budget allows, and the bisection goes on above it if it is then within;
- keeps for every method still to run the time of one trial (the longest so far), so that a slow
  method tried early cannot leave the later ones untried;
- starts no trial that would end after the time budget (or in the time kept), going by the method's
  longest trial so far (before its first: the longest trial of the methods before it).
Every trial prints one line. The result holds every trial, the Pareto fronts and the chosen model
(onnxmerge.search.front); onnxmerge.search.report writes them.
"""

from onnxmerge.calibration.calibrate import CalibrationConfig

DEFAULT_MAX_LOSS = 1.0  # points of accuracy per task
DEFAULT_TIME_BUDGET_S = 600.0  # a LeNet-size pair: every method's bisection on 2 cores
OBJECTIVES = ("size", "latency")
# each candidate's calibration (where --steps / --patience are not given): a third of a plain merge's
# budget (CalibrationConfig), so that the time budget holds up to about three times as many trials; a setting
# is judged by what this budget recovers (README "Calibration defaults")
CANDIDATE_CALIBRATION = CalibrationConfig(steps=2000, patience=5)
