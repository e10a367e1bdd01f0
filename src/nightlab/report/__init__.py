"""What the user looks at: the live view, the HTML report and plots, samples from the best model."""
