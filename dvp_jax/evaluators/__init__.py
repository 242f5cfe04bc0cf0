"""Evaluations of a model's variables, shared by the training loop and ``dvp_jax.evaluate``.

The interface (in the spirit of big_vision's evaluators): a plug-in is built once from the
model (a Flax module), where its examples come from (``data.EvalData``: input settings and
global batch), the split(s) and the mesh; calling it on model variables
({'params', 'batch_stats'}, replicated on the mesh) returns a dict of metrics in percent:

    accuracy.Accuracy        {'top1', 'top5'} of the classifier, centre crops
    multicrop.TenCropAccuracy {'top1', 'top5'} of the mean softmax over ten crops
    knn.Knn                  {'top1', 'top5'} of MoCo's weighted k-NN (train bank, sharded)
    ensemble.Ensemble        {'top1', 'top5'} of the mean softmax of several models

Each also has ``predict(variables) -> passes.Predictions`` (scores / features / labels of one
pass), so that one pass can serve two plug-ins and an ensemble can combine its members.
The training loop wraps plug-ins into ``loop.Task.evaluators`` (state -> metrics) in
trainers/common.py and trainers/classify.py; ``eval_files`` writes every eval / best JSON.
"""
