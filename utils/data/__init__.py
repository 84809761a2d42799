"""The data a run reads: CIFAR and image folders, their transforms, the batch order, and where
batches are made (workers or the device)."""
