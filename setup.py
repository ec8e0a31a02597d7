"""Only what pyproject.toml cannot say: install ``optimum_rom_autoload.pth`` into site-packages.

A ``.pth`` file must sit at the top of the wheel (site-packages), outside any package, which
setuptools has no setting for. The ``build_pth`` step puts it there: into the build directory for
a wheel (``pip install .``), and into the editable wheel for ``pip install -e .``.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH = "optimum_rom_autoload.pth"


class build_pth(Command):  # noqa: N801  (setuptools command names are lowercase)
    description = f"put {PTH} at the top of the wheel"
    user_options: list = []
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        # An editable wheel is assembled from the install directory, a regular one from build_lib.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(target) / PTH))

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / PTH)]


class build_with_pth(build):  # noqa: N801
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
