pytest_plugins = ["mmalign.devcluster.testing"]
