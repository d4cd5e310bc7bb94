"""Model registry: `create_model(name, num_classes, channels, img_size, stem)`."""
# import the submodules (not their factories) so `models.convnet` stays the module
from . import convnet, densenet, resnet
from .gan import Discriminator, Generator, conditional_noise, generate

# name -> factory(num_classes, channels, img_size, stem='cifar')
_MODELS = {
    'convnet': convnet.convnet,
    'densenet': densenet.densenet,
    'resnet10': resnet.resnet10,
    'resnet18': resnet.resnet18,
    'resnet34': resnet.resnet34,
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'resnet10_ap': resnet.resnet10_ap,
    'resnet18_ap': resnet.resnet18_ap,
    'resnet34_ap': resnet.resnet34_ap,
    'resnet50_ap': resnet.resnet50_ap,
    'resnet101_ap': resnet.resnet101_ap,
}


def list_models():
    return list(_MODELS)


def create_model(name, num_classes, channels, img_size, stem='cifar'):
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(_MODELS)}")
    return _MODELS[name](num_classes=num_classes, channels=channels, img_size=img_size, stem=stem)


__all__ = ['create_model', 'list_models', 'Generator', 'Discriminator', 'conditional_noise', 'generate']
