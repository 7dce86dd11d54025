"""Loaded (as sitecustomize) by every process of the CPU engine tests: lets Accelerate host FSDP and
DeepSpeed on gloo CPU ranks, as it does on GPU ranks.

Accelerate selects FSDP or DeepSpeed only for GPU-like distributed types; on a CPU-only machine it
falls back to gloo DDP and wraps a ZeRO-3-partitioned or FSDP-planned model in DDP instead. Axolotl
builds its FSDP device mesh for "cuda". Both are device checks, not engine logic: this shim changes
those (the distributed type after AcceleratorState's own setup, the mesh's device type), plus one
gloo-only step of ZeRO-1/2, the build of an all-reduce kernel gloo ranks never use, and the device
map of `axolotl evaluate`'s ranks (below), and nothing else. The rest — Axolotl's config handling, model
loading under zero.Init, Accelerate's fully_shard / deepspeed.initialize, the engines' hooks,
saving — runs as on GPUs.
"""

import importlib.abc
import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    from accelerate import state as _state
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    _build_mesh = ParallelismConfig.build_device_mesh

    def _build_cpu_mesh(self, device_type):
        return _build_mesh(self, "cpu" if device_type == "cuda" else device_type)

    ParallelismConfig.build_device_mesh = _build_cpu_mesh

    def _zero12_gather_in_this_thread():
        """ZeRO-1/2 gather their updated partitions into split views of one flat buffer; gloo's
        all_gather_into_tensor writes into those views from its own thread, where autograd refuses
        it ("Output 0 of Split is a view and is being modified inplace"). Gather into fresh tensors
        and copy into the views here, under no_grad as DeepSpeed's step runs."""
        from deepspeed.runtime.zero import stage_1_and_2

        def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group, *args, **kwargs):
            for partitions, group in zip(partitioned_param_groups, dp_process_group):
                if torch.distributed.get_world_size(group) == 1:
                    continue
                mine = partitions[torch.distributed.get_rank(group)]
                gathered = [torch.empty_like(part) for part in partitions]
                torch.distributed.all_gather(gathered, mine.contiguous(), group=group)
                with torch.no_grad():
                    for part, values in zip(partitions, gathered):
                        part.copy_(values)

        stage_1_and_2.all_gather_dp_groups = all_gather_dp_groups

    def _no_shared_memory_all_reduce(module):
        """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (ninja, into
        ~/.cache/torch_extensions, under a file lock) whenever it sets up its process group, and
        uses it only where LOCAL_SIZE is set, which torchrun does not set. A rank killed while it
        held that lock left every later DeepSpeed run on the machine waiting for it, before any
        training: build_shm_op builds nothing (DeepSpeed then uses plain torch.distributed, as it
        does without the op)."""
        module.build_shm_op = lambda: None

    def _ranks_on_the_cpu(module):
        """Axolotl's normalize_config maps each rank to device LOCAL_RANK, a GPU; on CPU ranks the
        model is loaded on the CPU. In training the plugin's dataset hook does this (it runs
        between normalize_config and the model loader); `axolotl evaluate` calls no plugin hook
        there, so on CPU ranks this shim does it (on GPU ranks Axolotl's map is right)."""
        normalize = module.normalize_config

        def normalize_config(cfg):
            normalize(cfg)
            if isinstance(cfg.device_map, dict) and any(isinstance(v, int) for v in cfg.device_map.values()):
                cfg.device_map = {"": "cpu"}

        module.normalize_config = normalize_config

    PATCH_ON_IMPORT = {"deepspeed.comm.torch": _no_shared_memory_all_reduce, "axolotl.utils.config": _ranks_on_the_cpu}

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Applies PATCH_ON_IMPORT to each module as it loads (nothing is imported early)."""

        def find_spec(self, name, path=None, target=None):
            if name not in PATCH_ON_IMPORT:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                PATCH_ON_IMPORT[name](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())

    _init = _state.AcceleratorState.__init__

    def _init_with_engine(self, *args, deepspeed_plugin=None, fsdp_plugin=None, **kwargs):
        _init(self, *args, deepspeed_plugin=deepspeed_plugin, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and deepspeed_plugin is not None:
            from deepspeed import comm

            if not comm.is_initialized():
                comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            _zero12_gather_in_this_thread()
            plugins = deepspeed_plugin if isinstance(deepspeed_plugin, dict) else {"default": deepspeed_plugin}
            for plugin in plugins.values():
                plugin.set_mixed_precision(self._mixed_precision)
            next(iter(plugins.values())).select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self.distributed_type = DistributedType.DEEPSPEED
        elif fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
        # As AcceleratorState does at the end of its own setup: later AcceleratorState() calls copy
        # PartialState's distributed type back.
        _state.PartialState._shared_state["distributed_type"] = self.distributed_type

    _state.AcceleratorState.__init__ = _init_with_engine
