"""Serve a trained run over HTTP, with the review page (`python serve.py --help`; after pip install
"dinomaly[serve]" also `dinomaly-serve`)."""
from dinomaly.cli import serve_main

if __name__ == "__main__":
    serve_main()
