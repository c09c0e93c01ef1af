@echo off
rem Build a one-file, windowed Windows EXE of aigateway.py with PyInstaller.
rem Needs Python 3.10+ on PATH:   python -m pip install pyinstaller
rem .ci/run builds with the same options on Linux (it reads them from this file).
setlocal
python -m PyInstaller --onefile --windowed --name aigateway --clean --noconfirm ^
  --exclude-module unittest --exclude-module pydoc --exclude-module pydoc_data ^
  --exclude-module doctest --exclude-module pdb --exclude-module xmlrpc ^
  --exclude-module lib2to3 --exclude-module multiprocessing ^
  --exclude-module tkinter.tix --exclude-module decimal --exclude-module _decimal ^
  --exclude-module pickle --exclude-module _pickle --exclude-module bz2 --exclude-module lzma ^
  --exclude-module email --exclude-module xml ^
  --exclude-module _codecs_cn --exclude-module _codecs_jp --exclude-module _codecs_kr ^
  --exclude-module _codecs_tw --exclude-module _codecs_hk --exclude-module _codecs_iso2022 ^
  aigateway.py
if errorlevel 1 exit /b 1
for %%F in (dist\aigateway.exe) do echo Built dist\aigateway.exe: %%~zF bytes
