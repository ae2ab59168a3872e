"""Training: the Trainer and TrainState that own the loop's state (trainer) and the multi-task loss with
haversine label smoothing (losses). Imports: config, errors, data, model, inference,
dist."""
