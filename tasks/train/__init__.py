"""Training stage: Ray Train workers fit the student to stored teacher soft labels."""
