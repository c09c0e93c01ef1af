@echo off
rem Build a one-file Windows EXE of aigateway.py with PyInstaller.
rem Needs Python 3.10+ on PATH:  pip install pyinstaller
setlocal
python -m PyInstaller --onefile --name aigateway --clean --noconfirm ^
  --exclude-module unittest --exclude-module pydoc --exclude-module doctest ^
  --exclude-module xmlrpc --exclude-module lib2to3 --exclude-module sqlite3 ^
  --exclude-module multiprocessing --exclude-module email.mime ^
  aigateway.py
if errorlevel 1 exit /b 1
echo Built dist\aigateway.exe
