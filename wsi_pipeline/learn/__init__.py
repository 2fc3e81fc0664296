"""Training and evaluating classifier cards: labelled folders, training, scores."""
