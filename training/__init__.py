"""Training: MLE, MLE-guided parameter search (MGS), minimum risk training and policy gradient."""
