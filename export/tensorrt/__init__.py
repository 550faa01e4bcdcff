"""TensorRT side of export: the ``galip::LMI`` plugin (AOT, PTX embedded in the engine).

Nothing here imports ``tensorrt`` at module import; see
:func:`galip.export.tensorrt.lmi_plugin.register_lmi_plugin`.
"""
