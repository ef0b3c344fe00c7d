import os
import sys

# helper modules beside the tests (toy data, the DDP worker script) import by bare name in any pytest import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
