"""The one place that turns configurations (config.py) into the objects they describe: the
UNet, the diffusion with its loss, and the sampler. Imports the model and the math, never
the configuration module, so that the configuration can use these to check itself.
"""
from diffusion import LEARNED_VARIANCES, GaussianDiffusion, GaussianDiffusionTrainer
from model import UNet
from sampling import OPTION_DEFAULTS, GaussianDiffusionSampler


def build_model(model, diffusion, layout=None):
    """The UNet of a ModelConfig (and the DiffusionConfig's T and variance: a learned variance
    doubles the output channels); layout: the checkpoint's, else the configuration's, else
    official."""
    var_channels = 2 if diffusion.var_type in LEARNED_VARIANCES else 1
    return UNet(T=diffusion.T, ch=model.ch, ch_mult=model.ch_mult, attn=model.attn,
                num_res_blocks=model.num_res_blocks, dropout=model.dropout,
                in_ch=model.img_channels, out_ch=var_channels * model.img_channels,
                img_size=model.img_size, layout=layout or model.layout or "official",
                num_classes=model.num_classes)


def build_diffusion(diffusion):
    """q(x_t | x_0) and every coefficient of the DiffusionConfig's schedule (for bits/dim)."""
    return GaussianDiffusion(diffusion.betas())


def build_trainer(net, diffusion, training=None):
    """The training loss of the DiffusionConfig, for the network net, weighted as the
    TrainingConfig says (--hybrid_lambda, --snr_gamma; None: the trainer's defaults)."""
    weighting = {} if training is None else dict(hybrid_lambda=training.hybrid_lambda,
                                                  snr_gamma=training.snr_gamma)
    return GaussianDiffusionTrainer(net, diffusion.betas(), diffusion.mean_type, diffusion.loss_type,
                                    diffusion.var_type, **weighting)


def build_sampler(sampling, diffusion, num_classes=0):
    """The sampler of a SamplingConfig on the DiffusionConfig's chain, for a network of
    num_classes classes (a ModelConfig's; 0: unconditional); call it with the network."""
    return GaussianDiffusionSampler(
        diffusion.betas(), diffusion.mean_type, diffusion.var_type, sampling.clip_denoised, sampling.sampler,
        sampling.sample_steps or None, skip_type=None if sampling.skip_type == "auto" else sampling.skip_type,
        num_classes=num_classes, guidance_scale=sampling.guidance_scale, karras_rho=sampling.karras_rho,
        sigma_min=sampling.sigma_min, sigma_max=sampling.sigma_max,
        **{name: getattr(sampling, name) for name in OPTION_DEFAULTS})
