"""Engine integrations (transformers, vLLM). Each module imports its engine when it is imported, and
the core (`mole_kernels` without this package) never imports them: `import mole_kernels` costs
nothing extra where no engine is installed."""
