"""DicomFlow's network boundary: every contact with pynetdicom lives in this package.

``services/`` never imports pynetdicom; it calls this package, which returns DicomFlow's
own types. Patches to pynetdicom's internals are installed only by a daemon's ``main``
through :func:`pipeline.dicom.patches.install` — importing a module here changes nothing
(README, Design notes for contributors).
"""
