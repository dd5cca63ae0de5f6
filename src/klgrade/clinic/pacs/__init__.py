"""klgrade in the hospital: DICOM results (SR + Secondary Capture) and a DICOMweb client loop.

- ``grading``: one instance -> knee grades through the clinic's ``Grader`` (the same code as
  ``klgrade predict``), plus what the results must say about the model (name, version, weights).
- ``sr``: the DICOM Structured Report (TID 1500 measurement report, written with highdicom).
- ``sc``: the Secondary Capture (film + Grad-CAM + grades burned in, NOT FOR PRIMARY DIAGNOSIS).
- ``dicomweb``: QIDO-RS / WADO-RS / STOW-RS loop behind ``klgrade pacs`` (dicomweb-client).

Both result objects copy the source's Patient and Study modules exactly (they go back into the
same study); nothing here logs a patient identifier.
"""

import logging as _logging

# highdicom logs every copied module (and dicomweb-client every request URL) at INFO with the
# source's UIDs, and `retrying` (under dicomweb-client) a traceback with the URL per failed
# request: klgrade's log carries neither, it says what failed in one line of its own.
for _name, _level in (("highdicom", _logging.WARNING), ("dicomweb_client", _logging.WARNING),
                      ("retrying", _logging.ERROR)):
    _logging.getLogger(_name).setLevel(_level)
