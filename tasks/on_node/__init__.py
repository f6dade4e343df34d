"""The programs that run on the GPU node (shipped by the task's file_mounts and run with the
image's Python): node (the node program) and compile_cache. Standard library only; nothing here
imports the rest of modelferry."""
