"""Judging a sender: receiver cases (scenarios/senders/), the receivers that stage them, and the senders under test.

A receiver case is a misbehaving receiving MTA (``lab.sender.receivers``) and, per destination control
(docs/rules.md §6), what a sender must do with one message for it. The sender under test is a seam
(``lab.sender.seam.ISender``) with kinds: the lab's own client engine (``lab.sender.labsender``) and an external
sender started and fed as a profile says (``lab.sender.external``). ``lab.sender.run`` runs every case against a
sender, judges what crossed the wire from the receivers' capture (``lab.sender.observe``), and returns the
record every report is drawn from.
"""
