"""`python -m ichiban_comm --version` / `--info`."""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ichiban_comm", description=__doc__)
    p.add_argument("--version", action="store_true", help="print the version and build facts")
    p.add_argument("--json", action="store_true", help="print build facts as JSON")
    args = p.parse_args(argv)
    import ichiban_comm

    info = ichiban_comm.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cuda = f"yes, archs {';'.join(info['cuda_archs'])} ({info['nvcc']})" if info["cuda"] else "no"
    print(f"ichiban_comm {info['version']}")
    print(f"  built against torch {info['torch_built']}, running torch {info['torch_running']}")
    print(f"  CUDA sources: {cuda}")
    print(f"  compiler: {info['compiler']}")
    print(f"  python: {info['python']}, native threads: {info['native_threads']}")
    print(f"  location: {info['location']}")
    if not args.version:
        p.print_usage()
    return 0


if __name__ == "__main__":
    sys.exit(main())
