from data.datasets import (DATASET_CHOICES, DATASETS, BatchStream, DatasetInfo, Split, info_from_dict,
                           load_dataset, test_batches, to_classifier_input, to_gan_range)
