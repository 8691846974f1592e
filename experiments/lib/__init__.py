"""The experiment framework: declarations, runner, launcher, reports."""
