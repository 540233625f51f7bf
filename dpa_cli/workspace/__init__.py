"""The workspace: the folder `dpa upgrade` creates and every later command works in.

`layout` spells its folder and file names, `manifest` reads and writes its record (dpa.yaml) and finds it,
`results` says which model folder (and adapter) a stage left. Every command reads the workspace through here.
"""
