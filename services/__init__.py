"""DicomFlow's daemons (receive, filter, send) and the ``dicomflow`` command."""
