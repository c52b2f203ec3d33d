"""The simulated SPARCS screen: ``synth`` renders control, timecourse and screen slides and writes the truth
(gRNA, gene, true state per cell) apart from the images."""
