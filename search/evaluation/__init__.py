"""Scoring masks: the run object strategies see, the plain and prefix-reuse engines, executors and Ray Tune."""
