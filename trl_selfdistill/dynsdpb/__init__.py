"""DynSDPB: dynamic self-distillation from the previous mini-batch (Fu et al., arXiv 2411.16991), on top of DLB."""
