"""The concerns of ``dicomflow send`` (README, How it works), mixed into
:class:`services.send.Sender`, which keeps the loop and the state: ``health`` (down,
up, busy), ``lanes`` (the endpoint's associations, one worker thread each),
``planning`` (which files share an association; each file's meta),
``delivery`` (the C-STOREs, transcoding) and ``outcomes`` (sent, failed, retried,
postponed moves). Nothing here imports pynetdicom: the network is
:mod:`pipeline.dicom.scu`.
"""
