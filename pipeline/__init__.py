"""DicomFlow's library: the spool, configuration, rules and DICOM helpers the daemons share."""
