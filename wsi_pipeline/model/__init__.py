"""The classifier: cards (model, classes, weights), inference, saliency."""
