"""The schedules of misc/reproduce.py, which misc/results.py also reads to describe each row."""

# The schedules. `paper` is the official one (150 + 100 epochs at width 196, 1000 evaluation epochs).
# `cpu` fits about 90 minutes per dataset on 2 CPU cores; docs/RESULTS.md says why each number was chosen.
SCHEDULES = {
    'paper': dict(width=196, stage1=dict(epochs=150, lr=1e-4, batch_size=128),
                  stage2=dict(epochs=100, lr=5e-6, batch_size=64, epochs_match_train=16),
                  eval=dict(epochs_eval=1000, test_interval=200, num_eval=3, val_per_class=10),
                  stage_eval_ipc=50, ipcs=(1, 10, 50), eval_models=('convnet', 'resnet18'), full_epochs=1000),
    'cpu': {
        'digits': dict(width=64, stage1=dict(epochs=50, lr=1e-3, batch_size=128),
                       stage2=dict(epochs=4, lr=1e-4, batch_size=64, epochs_match_train=16),
                       eval=dict(epochs_eval=100, test_interval=20, num_eval=3, val_per_class=10),
                       stage_eval_ipc=10, ipcs=(1, 10, 50), eval_models=('convnet',), full_epochs=30),
        'mnist': dict(width=32, stage1=dict(epochs=2, lr=5e-4, batch_size=128), stage2=None,
                      eval=dict(epochs_eval=100, test_interval=50, num_eval=3, val_per_class=10),
                      stage_eval_ipc=10, ipcs=(1, 10, 50), eval_models=('convnet',), full_epochs=1),
        'cifar10-jpeg': dict(width=32, stage1=dict(epochs=3, lr=5e-4, batch_size=128), stage2=None,
                             eval=dict(epochs_eval=100, test_interval=50, num_eval=3, val_per_class=10),
                             stage_eval_ipc=10, ipcs=(1, 10, 50), eval_models=('convnet',), full_epochs=1,
                             # the one-epoch full row (59%) is too weak to teach soft labels: reproduce.py
                             # trains a teacher of each length and keeps the best on held-out images
                             teacher_epochs=(2, 4, 8)),
    },
}


# `cpu-3x`: one point of more compute, MNIST's cpu schedule with three times stage 1's epochs (6 instead of 2;
# RESULTS.md once found 6 closing most of MNIST's ipc-10 gap to random real images), evaluated at ipc 1 and 10.
# `beside`: its DiM rows are read beside those of the cpu schedule (one table in RESULTS.md; the real-image
# rows and the teacher are the cpu schedule's: no generator in them)
SCHEDULES['cpu-3x'] = {
    'mnist': {**SCHEDULES['cpu']['mnist'], 'stage1': {**SCHEDULES['cpu']['mnist']['stage1'], 'epochs': 6},
              'ipcs': (1, 10), 'beside': 'cpu'},
}


def beside(dataset, name):
    """The schedule whose rows a variant schedule (cpu-3x) is read beside, None for a schedule of its own."""
    return SCHEDULES.get(name, {}).get(dataset, {}).get('beside')


def schedule_for(dataset, name):
    if name == 'paper':
        return SCHEDULES['paper']
    if dataset not in SCHEDULES.get(name, {}):
        others = [n for n in SCHEDULES if dataset in SCHEDULES[n] and n != 'paper']
        raise SystemExit(f"error: no {name} schedule for {dataset}; {dataset} has "
                         f"{', '.join(others + ['paper']) if others else 'paper only'}; the {name} schedule has "
                         f"{', '.join(SCHEDULES[name]) if name in SCHEDULES else 'no datasets'}")
    return SCHEDULES[name][dataset]


# misc/reproduce.py --labels soft: a schedule with `teacher_epochs` (candidate epoch counts) trains a teacher of
# each length on the full training set and keeps the best on held-out images (reproduce.py's
# teacher_chosen_on_held_out); otherwise the teacher is the full row's first classifier, kept by validate.py
# --save-classifier as TEACHER_FILE in that row's folder; when the full row ran without keeping one, a
# row of its own (tag TEACHER_TAG, one seed) trains it, which misc/results.py does not list as a result.
# Soft rows carry SOFT_SUFFIX in their tags.
TEACHER_TAG, TEACHER_FILE, SOFT_SUFFIX = 'teacher', 'teacher.pth', '-soft'
# misc/reproduce.py --select kmeans: fixed-set and random-real rows whose sets k-means chose in the teacher's
# features (validate.py --select kmeans --select-features TEACHER); their tags carry KMEANS_SUFFIX before
# any SOFT_SUFFIX
KMEANS_SUFFIX = '-kmeans'
